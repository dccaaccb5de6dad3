from dhwatch.cli import main

raise SystemExit(main())
