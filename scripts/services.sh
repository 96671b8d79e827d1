#!/usr/bin/env bash
# Make sure the local RabbitMQ and Postgres answer (start them if not); fail loudly otherwise.
# Sourced by the quick-start scripts and by .ci/run.
wo_port_open() { (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wo_services_up() {
  if ! wo_port_open 5672; then
    echo "starting RabbitMQ..."; rabbitmq-server -detached >/dev/null 2>&1 || true
  fi
  if ! wo_port_open 5432; then
    echo "starting Postgres..."
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >/dev/null 2>&1 || true
  fi
  local i
  for i in $(seq 90); do
    if wo_port_open 5672 && wo_port_open 5432 \
       && psql -h 127.0.0.1 -U postgres -tAc 'select 1' >/dev/null 2>&1; then
      return 0
    fi
    sleep 1
  done
  echo "ERROR: RabbitMQ (5672) and Postgres (5432) must be running on 127.0.0.1." >&2
  echo "  start them: rabbitmq-server -detached; pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
  return 1
}
