"""Pure readers of Xen memory file formats: no Volatility import anywhere in this wing.

elfcore (the ELF container), notes (``.note.Xen``), vcpu (``vcpu_guest_context``
layouts), sharedinfo, pagemap (pfn tables as run maps), dumpcore (``xl dump-core``
files).  Everything here raises only ``errors.XenFormatError`` on bad input.
"""
