from seesaw_mc.cli import main

raise SystemExit(main())
