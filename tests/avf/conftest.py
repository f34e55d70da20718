"""``EMULAB_KERNELS=interpreted``: the data-path tests run against the kernels' interpreted forms
(``datapath.kernels.interpret``), which a device runs until its compiled kernels are loaded."""

from __future__ import annotations

import os

from emulab.avf import datapath as dp

if os.environ.get("EMULAB_KERNELS") == "interpreted":
    for _name, _kernel in dp.KERNELS.all.items():
        setattr(dp, _name, _kernel.interpreted)
