from workflow_orchestrator.cli import main

main()
