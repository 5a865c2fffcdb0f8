"""Who this implementation says it is on the wire (PS3.7 D.3.3.2) and in File Meta (PS3.10 7.1).

The Implementation Class UID is our own, under the UUID-derived root 2.25 (PS3.5 B.2), generated
once for dicomnode; it must never be pynetdicom's or pydicom's default.
"""

from __future__ import annotations

import logging

from pynetdicom import AE, _config

from dicomnode import __version__
from dicomnode.config import Config, Limits
from dicomnode.dimse_codec import install_codec_hooks
from dicomnode.reactor import install_reactor_hooks

IMPLEMENTATION_CLASS_UID = "2.25.266543221878405816488887163786338675912"
# PS3.7 D.3.3.2: 1-16 characters of the default repertoire.
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]


def new_ae(config: Config) -> AE:
    """A pynetdicom AE that is us: our AE title and implementation identity, the configured
    maximum PDU size we announce (PS3.8 D.1) and ACSE/DIMSE/network timeouts. Used by the SCP
    (dicomnode.ae) and every SCU (dicomnode.scu)."""
    # Event-driven association loops instead of pynetdicom's 1 ms polling (dicomnode.reactor).
    install_reactor_hooks()
    install_codec_hooks()  # command sets encoded without pydicom (dicomnode.dimse_codec)
    # pynetdicom's "standard" handlers describe every PDU and DIMSE message in many lines
    # (about 0.2 ms each) before its logger discards them: it logs them at INFO and DEBUG, and
    # dicomnode.cli keeps that logger at WARNING unless asked for more.
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=config.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    apply_limits(ae, config.limits)
    return ae


def apply_limits(ae: AE, limits: Limits) -> None:
    """The configured PDU size and timeouts, for associations made from now on (also at a
    configuration reload)."""
    ae.maximum_pdu_size = limits.max_pdu_size
    ae.acse_timeout = limits.acse_timeout
    ae.dimse_timeout = limits.dimse_timeout
    ae.network_timeout = limits.network_timeout
