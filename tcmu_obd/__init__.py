"""tcmu-obd: serve overlaybd images to the Linux kernel (TCMU) and to VMs (NBD), loading lazily."""

__version__ = "0.1.0"
