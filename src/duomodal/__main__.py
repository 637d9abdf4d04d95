from duomodal.cli import main

raise SystemExit(main())
