"""``python -m nimu_rt`` runs the nimu-rt command."""

from nimu_rt.cli import main

raise SystemExit(main())
