from herbarium.cli import main

raise SystemExit(main())
