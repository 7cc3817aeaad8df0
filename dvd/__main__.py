from dvd.cli import main

raise SystemExit(main())
