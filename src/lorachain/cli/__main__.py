from lorachain.cli import main

raise SystemExit(main())
