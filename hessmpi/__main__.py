from hessmpi.cli import main

raise SystemExit(main())
