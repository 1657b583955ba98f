from topology_store.cli.main import main

raise SystemExit(main())
