"""Software drivers: device drivers that run in this process and drive a served device through
:mod:`emulab.client`, as a guest's kernel driver would through QEMU.

* :mod:`emulab.drivers.iavf_mailbox` -- :class:`GuestDriver`, the admin queue and virtchnl
  mailbox of a software iavf (guest memory, BAR0, reset handshake);
* :mod:`emulab.drivers.iavf_nic` -- :class:`NicDriver`, its bring-up and data path: TX/RX
  descriptor rings, interrupts, statistics, VF reset.
"""

from emulab.drivers.iavf_mailbox import GuestDriver, MailboxError, MailboxMessage
from emulab.drivers.iavf_nic import Nic, NicDriver, Ring

__all__ = ["GuestDriver", "MailboxError", "MailboxMessage", "Nic", "NicDriver", "Ring"]
