"""The ledger's schema: versioned migrations, applied at start-up under an advisory lock (SPEC §6).

A replica refuses a ledger whose schema is newer than it knows (a rolling upgrade that went the
other way), and read-only users (the console, `status`, `history`) only check the version."""

from __future__ import annotations

import asyncpg

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
VERSION_TABLE = "ledger_schema_version"
_MIGRATION_LOCK = 0x574F_4C45_4447  # "WOLEDG": serialises migrations of concurrent replicas

MIGRATIONS: list[str] = [
    # 1: inbox of decisions and their effects, run state, timers; and the three statements of the
    # hot path, so a step costs three round trips (it took ~12 as separate statements):
    # wo_enter (lock + state), wo_record (inbox + run + timers), CALL wo_exit (done marks + unlock).
    """
    CREATE TABLE runs (
        workflow_id text PRIMARY KEY,
        current_step text,
        dispatch_id text,
        attempt integer NOT NULL DEFAULT 1,
        phase text NOT NULL,
        workflow_start_time timestamptz,
        step_time timestamptz,
        dispatched_at timestamptz,
        request jsonb NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX runs_active ON runs (updated_at) WHERE phase <> 'finished';
    CREATE TABLE inbox (
        seq bigserial PRIMARY KEY,
        message_key text NOT NULL UNIQUE,
        workflow_id text NOT NULL,
        outcome text NOT NULL,
        effects json,  -- written once, read only to resume: json spares Postgres the jsonb conversion
        done boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL DEFAULT now(),
        done_at timestamptz
    );
    CREATE INDEX inbox_pending ON inbox (workflow_id, seq) WHERE NOT done;
    CREATE INDEX inbox_done_at ON inbox (done_at) WHERE done;
    CREATE TABLE timers (
        id bigserial PRIMARY KEY,
        workflow_id text NOT NULL,
        kind text NOT NULL,
        token text NOT NULL,
        due_at timestamptz NOT NULL,
        payload jsonb,
        locked_until timestamptz
    );
    CREATE INDEX timers_due ON timers (due_at);
    CREATE INDEX timers_workflow ON timers (workflow_id);
    CREATE FUNCTION wo_state(p_wid text, p_key text) RETURNS jsonb LANGUAGE sql STABLE AS $f$
        SELECT jsonb_build_object(
            'rows', coalesce((SELECT jsonb_agg(jsonb_build_object('seq', i.seq, 'message_key', i.message_key,
                                  'outcome', i.outcome, 'effects', i.effects, 'done', i.done) ORDER BY i.seq)
                              FROM inbox i WHERE i.message_key = p_key OR (i.workflow_id = p_wid AND NOT i.done)),
                             '[]'::jsonb),
            'run', (SELECT to_jsonb(r) FROM runs r WHERE r.workflow_id = p_wid))
    $f$;
    CREATE FUNCTION wo_enter(p_wid text, p_key text) RETURNS jsonb LANGUAGE plpgsql AS $f$
    BEGIN
        PERFORM pg_advisory_lock(hashtextextended(p_wid, 0));
        RETURN wo_state(p_wid, p_key);
    END
    $f$;
    -- A procedure, CALLed outside a transaction block, so the done marks are committed BEFORE the
    -- unlock: the next holder (waiting in wo_enter) must not take its snapshot before that commit,
    -- or it would see the effects as unfinished and carry them out again.
    CREATE PROCEDURE wo_exit(p_wid text, p_done bigint[]) LANGUAGE plpgsql AS $f$
    BEGIN
        IF cardinality(p_done) > 0 THEN
            UPDATE inbox SET done = true, done_at = now(), effects = NULL WHERE seq = ANY(p_done);
        END IF;
        COMMIT;
        PERFORM pg_advisory_unlock(hashtextextended(p_wid, 0));
    END
    $f$;
    CREATE FUNCTION wo_record(p_key text, p_wid text, p_outcome text, p_effects json, p_run jsonb,
                              p_cancel_timers boolean, p_timers jsonb) RETURNS bigint LANGUAGE plpgsql AS $f$
    DECLARE v_seq bigint;
    BEGIN
        INSERT INTO inbox (message_key, workflow_id, outcome, effects, done, done_at)
        VALUES (p_key, p_wid, p_outcome, p_effects, p_effects IS NULL, CASE WHEN p_effects IS NULL THEN now() END)
        RETURNING seq INTO v_seq;
        IF p_run IS NOT NULL THEN
            INSERT INTO runs (workflow_id, current_step, dispatch_id, attempt, phase, workflow_start_time,
                              step_time, dispatched_at, request)
            SELECT p_wid, r.current_step, r.dispatch_id, r.attempt, r.phase, r.workflow_start_time, r.step_time,
                   r.dispatched_at, coalesce(r.request, '{}'::jsonb)
              FROM jsonb_to_record(p_run) AS r(current_step text, dispatch_id text, attempt integer, phase text,
                   workflow_start_time timestamptz, step_time timestamptz, dispatched_at timestamptz, request jsonb)
            ON CONFLICT (workflow_id) DO UPDATE SET current_step = EXCLUDED.current_step,
                dispatch_id = EXCLUDED.dispatch_id, attempt = EXCLUDED.attempt, phase = EXCLUDED.phase,
                workflow_start_time = EXCLUDED.workflow_start_time, step_time = EXCLUDED.step_time,
                dispatched_at = EXCLUDED.dispatched_at, request = EXCLUDED.request, updated_at = now();
        END IF;
        IF p_cancel_timers THEN
            DELETE FROM timers WHERE workflow_id = p_wid AND kind IN ('scheduled', 'timeout', 'retry');
        END IF;
        IF jsonb_array_length(p_timers) > 0 THEN
            INSERT INTO timers (workflow_id, kind, token, due_at)
            SELECT p_wid, t.kind, t.token, t.due_at
              FROM jsonb_to_recordset(p_timers) AS t(kind text, token text, due_at timestamptz);
        END IF;
        RETURN v_seq;
    END
    $f$;
    """,
    # 2: group commit. The steps in flight share one connection: what they ask while a round trip is
    # under way goes in the next CALL, so N steps cost one round trip and one commit instead of 3N
    # and 2N. Order inside: decisions (each in its own subtransaction, so one bad row fails alone),
    # done marks, COMMIT, then unlocks (after the commit, as in wo_exit), then entries, whose locks
    # are only tried: a workflow held by another replica is entered on a pooled connection that waits.
    """
    -- A decision's effects (~5 KB: the record and the requests) are compressed when stored; lz4
    -- costs a fraction of the default pglz's CPU. Where Postgres has no lz4 (before 14, or built
    -- without it), pglz stays.
    DO $d$ BEGIN
        EXECUTE 'ALTER TABLE inbox ALTER COLUMN effects SET COMPRESSION lz4';
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'lz4 compression unavailable (%); effects stay compressed with pglz', SQLERRM;
    END $d$;
    CREATE PROCEDURE wo_batch(p_keys text[], p_wids text[], p_outcomes text[], p_effects json[], p_runs text[],
                              p_cancel boolean[], p_timers text[], p_done bigint[], p_unlock text[],
                              p_enter_wids text[], p_enter_keys text[], p_enter_lock boolean[],
                              INOUT result jsonb) LANGUAGE plpgsql AS $f$
    DECLARE
        v_seqs jsonb := '[]';
        v_states jsonb := '[]';
        i integer;
    BEGIN
        FOR i IN 1..coalesce(cardinality(p_keys), 0) LOOP
            BEGIN
                v_seqs := v_seqs || to_jsonb(wo_record(p_keys[i], p_wids[i], p_outcomes[i], p_effects[i],
                                                       p_runs[i]::jsonb, p_cancel[i], p_timers[i]::jsonb));
            EXCEPTION WHEN OTHERS THEN
                v_seqs := v_seqs || jsonb_build_object('error', SQLERRM, 'sqlstate', SQLSTATE);
            END;
        END LOOP;
        IF coalesce(cardinality(p_done), 0) > 0 THEN
            UPDATE inbox SET done = true, done_at = now(), effects = NULL WHERE seq = ANY(p_done);
        END IF;
        COMMIT;
        FOR i IN 1..coalesce(cardinality(p_unlock), 0) LOOP
            PERFORM pg_advisory_unlock(hashtextextended(p_unlock[i], 0));
        END LOOP;
        FOR i IN 1..coalesce(cardinality(p_enter_wids), 0) LOOP
            IF NOT p_enter_lock[i] OR pg_try_advisory_lock(hashtextextended(p_enter_wids[i], 0)) THEN
                v_states := v_states || jsonb_build_array(wo_state(p_enter_wids[i], p_enter_keys[i]));
            ELSE
                v_states := v_states || '[null]'::jsonb;
            END IF;
        END LOOP;
        result := jsonb_build_object('seqs', v_seqs, 'states', v_states);
    END
    $f$;
    """,
    # 3: operator control and history (SPEC §12, §13). The run keeps what the console lists (repo,
    # milestones, status) so a list makes no Manager call per row; pause state; the heartbeat summary
    # of the current dispatch; and the history of every message and timer of a workflow.
    """
    ALTER TABLE runs
        ADD COLUMN deployment_repo text,
        ADD COLUMN milestones jsonb NOT NULL DEFAULT '[]',
        ADD COLUMN paused boolean NOT NULL DEFAULT false,
        ADD COLUMN held_step text,
        ADD COLUMN result text,
        ADD COLUMN deadline timestamptz,
        ADD COLUMN heartbeat_timeout double precision,
        ADD COLUMN heartbeat_first_at timestamptz,
        ADD COLUMN heartbeat_at timestamptz,
        ADD COLUMN heartbeat_count integer NOT NULL DEFAULT 0,
        ADD COLUMN heartbeat_details jsonb;
    ALTER TABLE runs ADD COLUMN status text GENERATED ALWAYS AS (
        CASE WHEN phase = 'finished' THEN coalesce(result, 'succeeded')
             WHEN paused THEN 'paused'
             WHEN phase IN ('waiting', 'backoff', 'held') THEN 'waiting'
             ELSE 'running' END) STORED;
    CREATE INDEX runs_status ON runs (status, workflow_start_time DESC);
    CREATE INDEX runs_started ON runs (workflow_start_time DESC);
    CREATE TABLE history (
        seq bigserial PRIMARY KEY,
        workflow_id text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        replica text NOT NULL DEFAULT '',
        trigger text NOT NULL,
        message_id text,
        dispatch_id text,
        outcome text NOT NULL,
        requested_by text,
        detail jsonb NOT NULL DEFAULT '{}'
    );
    CREATE INDEX history_workflow ON history (workflow_id, seq);
    CREATE INDEX history_at ON history (at);
    -- Heartbeats are summarised: one row per dispatch and outcome, updated in place.
    CREATE UNIQUE INDEX history_heartbeats ON history (workflow_id, dispatch_id, outcome) WHERE trigger = 'heartbeat';
    CREATE FUNCTION wo_note(p_wid text, p_history jsonb) RETURNS void LANGUAGE sql AS $f$
        INSERT INTO history (workflow_id, replica, trigger, message_id, dispatch_id, outcome, requested_by, detail)
        SELECT p_wid, coalesce(h.replica, ''), h.trigger, h.message_id, h.dispatch_id, h.outcome, h.requested_by,
               coalesce(h.detail, '{}'::jsonb)
          FROM jsonb_to_record(p_history) AS h(replica text, trigger text, message_id text, dispatch_id text,
               outcome text, requested_by text, detail jsonb)
    $f$;
    DROP PROCEDURE wo_batch;
    DROP FUNCTION wo_record;
    CREATE FUNCTION wo_record(p_key text, p_wid text, p_outcome text, p_effects json, p_run jsonb,
                              p_cancel_timers boolean, p_timers jsonb, p_history jsonb) RETURNS bigint
    LANGUAGE plpgsql AS $f$
    DECLARE v_seq bigint;
    BEGIN
        INSERT INTO inbox (message_key, workflow_id, outcome, effects, done, done_at)
        VALUES (p_key, p_wid, p_outcome, p_effects, p_effects IS NULL, CASE WHEN p_effects IS NULL THEN now() END)
        RETURNING seq INTO v_seq;
        IF p_run IS NOT NULL THEN
            INSERT INTO runs AS o (workflow_id, current_step, dispatch_id, attempt, phase, workflow_start_time,
                              step_time, dispatched_at, request, deployment_repo, milestones, paused, held_step,
                              result, deadline, heartbeat_timeout)
            SELECT p_wid, r.current_step, r.dispatch_id, r.attempt, r.phase, r.workflow_start_time, r.step_time,
                   r.dispatched_at, coalesce(r.request, '{}'::jsonb), r.deployment_repo,
                   coalesce(r.milestones, '[]'::jsonb), coalesce(r.paused, false), r.held_step, r.result,
                   r.deadline, r.heartbeat_timeout
              FROM jsonb_to_record(p_run) AS r(current_step text, dispatch_id text, attempt integer, phase text,
                   workflow_start_time timestamptz, step_time timestamptz, dispatched_at timestamptz, request jsonb,
                   deployment_repo text, milestones jsonb, paused boolean, held_step text, result text,
                   deadline timestamptz, heartbeat_timeout double precision)
            ON CONFLICT (workflow_id) DO UPDATE SET current_step = EXCLUDED.current_step,
                dispatch_id = EXCLUDED.dispatch_id, attempt = EXCLUDED.attempt, phase = EXCLUDED.phase,
                workflow_start_time = EXCLUDED.workflow_start_time, step_time = EXCLUDED.step_time,
                dispatched_at = EXCLUDED.dispatched_at, request = EXCLUDED.request,
                deployment_repo = EXCLUDED.deployment_repo, milestones = EXCLUDED.milestones,
                paused = EXCLUDED.paused, held_step = EXCLUDED.held_step, result = EXCLUDED.result,
                deadline = EXCLUDED.deadline, heartbeat_timeout = EXCLUDED.heartbeat_timeout,
                heartbeat_first_at = CASE WHEN o.dispatch_id IS DISTINCT FROM EXCLUDED.dispatch_id
                                          THEN NULL ELSE o.heartbeat_first_at END,
                heartbeat_at = CASE WHEN o.dispatch_id IS DISTINCT FROM EXCLUDED.dispatch_id
                                    THEN NULL ELSE o.heartbeat_at END,
                heartbeat_count = CASE WHEN o.dispatch_id IS DISTINCT FROM EXCLUDED.dispatch_id
                                       THEN 0 ELSE o.heartbeat_count END,
                heartbeat_details = CASE WHEN o.dispatch_id IS DISTINCT FROM EXCLUDED.dispatch_id
                                         THEN NULL ELSE o.heartbeat_details END,
                updated_at = now();
        END IF;
        IF p_cancel_timers THEN
            DELETE FROM timers WHERE workflow_id = p_wid AND kind IN ('scheduled', 'timeout', 'retry', 'heartbeat');
        END IF;
        IF jsonb_array_length(p_timers) > 0 THEN
            INSERT INTO timers (workflow_id, kind, token, due_at)
            SELECT p_wid, t.kind, t.token, t.due_at
              FROM jsonb_to_recordset(p_timers) AS t(kind text, token text, due_at timestamptz);
        END IF;
        IF p_history IS NOT NULL THEN
            PERFORM wo_note(p_wid, p_history);
        END IF;
        RETURN v_seq;
    END
    $f$;
    CREATE PROCEDURE wo_batch(p_keys text[], p_wids text[], p_outcomes text[], p_effects json[], p_runs text[],
                              p_cancel boolean[], p_timers text[], p_histories text[], p_note_wids text[],
                              p_notes text[], p_done bigint[], p_unlock text[],
                              p_enter_wids text[], p_enter_keys text[], p_enter_lock boolean[],
                              INOUT result jsonb) LANGUAGE plpgsql AS $f$
    DECLARE
        v_seqs jsonb := '[]';
        v_states jsonb := '[]';
        i integer;
    BEGIN
        FOR i IN 1..coalesce(cardinality(p_keys), 0) LOOP
            BEGIN
                v_seqs := v_seqs || to_jsonb(wo_record(p_keys[i], p_wids[i], p_outcomes[i], p_effects[i],
                                                       p_runs[i]::jsonb, p_cancel[i], p_timers[i]::jsonb,
                                                       p_histories[i]::jsonb));
            EXCEPTION WHEN OTHERS THEN
                v_seqs := v_seqs || jsonb_build_object('error', SQLERRM, 'sqlstate', SQLSTATE);
            END;
        END LOOP;
        FOR i IN 1..coalesce(cardinality(p_notes), 0) LOOP
            BEGIN
                PERFORM wo_note(p_note_wids[i], p_notes[i]::jsonb);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'history note of % not kept: %', p_note_wids[i], SQLERRM;
            END;
        END LOOP;
        IF coalesce(cardinality(p_done), 0) > 0 THEN
            UPDATE inbox SET done = true, done_at = now(), effects = NULL WHERE seq = ANY(p_done);
        END IF;
        COMMIT;
        FOR i IN 1..coalesce(cardinality(p_unlock), 0) LOOP
            PERFORM pg_advisory_unlock(hashtextextended(p_unlock[i], 0));
        END LOOP;
        FOR i IN 1..coalesce(cardinality(p_enter_wids), 0) LOOP
            IF NOT p_enter_lock[i] OR pg_try_advisory_lock(hashtextextended(p_enter_wids[i], 0)) THEN
                v_states := v_states || jsonb_build_array(wo_state(p_enter_wids[i], p_enter_keys[i]));
            ELSE
                v_states := v_states || '[null]'::jsonb;
            END IF;
        END LOOP;
        result := jsonb_build_object('seqs', v_seqs, 'states', v_states);
    END
    $f$;
    -- A heartbeat (SPEC §12): one statement, no advisory lock. The UPDATE's row lock orders it with a
    -- decision of the same workflow, and its WHERE re-checks the current dispatch after that commit.
    -- Returns NULL when applied, else why it is stale.
    CREATE FUNCTION wo_heartbeat(p_wid text, p_dispatch text, p_details jsonb, p_replica text,
                                 p_message_id text) RETURNS text LANGUAGE plpgsql AS $f$
    DECLARE
        v_run runs%ROWTYPE;
        v_why text;
    BEGIN
        UPDATE runs SET heartbeat_at = now(), heartbeat_first_at = coalesce(heartbeat_first_at, now()),
                        heartbeat_count = heartbeat_count + 1, heartbeat_details = p_details
         WHERE workflow_id = p_wid AND dispatch_id = p_dispatch AND phase = 'dispatched'
        RETURNING * INTO v_run;
        IF FOUND THEN
            IF v_run.heartbeat_timeout IS NOT NULL THEN
                UPDATE timers SET due_at = now() + make_interval(secs => v_run.heartbeat_timeout)
                 WHERE workflow_id = p_wid AND kind = 'heartbeat' AND token = p_dispatch AND locked_until IS NULL;
            END IF;
        ELSE
            SELECT * INTO v_run FROM runs WHERE workflow_id = p_wid;
            v_why := CASE
                WHEN NOT FOUND THEN format('no run of workflow %s in the ledger', p_wid)
                WHEN v_run.phase = 'finished' THEN 'the workflow has finished'
                WHEN v_run.dispatch_id IS DISTINCT FROM p_dispatch THEN
                    format('dispatch_id %s is not the current dispatch %s', p_dispatch,
                           coalesce(v_run.dispatch_id, '(none)'))
                ELSE format('no milestone is in flight (the run is %s)', v_run.phase) END;
        END IF;
        INSERT INTO history AS h (workflow_id, replica, trigger, message_id, dispatch_id, outcome, detail)
        VALUES (p_wid, p_replica, 'heartbeat', p_message_id, p_dispatch,
                CASE WHEN v_why IS NULL THEN 'decided' ELSE 'stale' END,
                jsonb_build_object('count', 1, 'first', now(), 'last', now(), 'details', p_details, 'why', v_why))
        ON CONFLICT (workflow_id, dispatch_id, outcome) WHERE trigger = 'heartbeat' DO UPDATE
           SET at = now(), replica = EXCLUDED.replica, message_id = EXCLUDED.message_id,
               detail = h.detail || jsonb_build_object('count', (h.detail->>'count')::int + 1, 'last', now(),
                                                        'details', p_details, 'why', v_why);
        RETURN v_why;
    END
    $f$;
    """,
]


class SchemaMismatch(Exception):
    """The ledger's schema is not the one this release knows; the message says what to do."""


async def schema_version(conn: Conn, table: str = VERSION_TABLE) -> int:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
    if not exists:
        return 0
    return int(await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}"))


def _too_new(current: int, known: int) -> SchemaMismatch:
    return SchemaMismatch(f"the ledger schema is at version {current}, newer than this release knows ({known}): "
                          "run a release at least as new as the one that migrated it")


async def check_schema(conn: Conn, migrations: list[str] | None = None, table: str = VERSION_TABLE) -> int:
    """Read-only users: the schema must be exactly this release's; never migrates."""
    known = len(MIGRATIONS if migrations is None else migrations)
    current = await schema_version(conn, table)
    if current > known:
        raise _too_new(current, known)
    if current < known:
        raise SchemaMismatch(f"the ledger schema is at version {current}, this release needs {known}: "
                             "start the service (workflow-orchestrator run) once to migrate it")
    return current


async def migrate(conn: Conn, migrations: list[str], lock_key: int, table: str) -> int:
    """Apply pending migrations in one transaction under an advisory lock; returns the version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (version integer PRIMARY KEY, "
                           "applied_at timestamptz NOT NULL DEFAULT now())")
        current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")
        if current > len(migrations):
            raise _too_new(current, len(migrations))
        for version, sql in enumerate(migrations, start=1):
            if version > current:
                await conn.execute(sql)
                await conn.execute(f"INSERT INTO {table} (version) VALUES ($1)", version)
        return len(migrations)


