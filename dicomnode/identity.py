"""Who this implementation says it is on the wire (PS3.7 D.3.3.2) and in File Meta (PS3.10 7.1).

The Implementation Class UID is our own, under the UUID-derived root 2.25 (PS3.5 B.2), generated
once for dicomnode; it must never be pynetdicom's or pydicom's default.
"""

from dicomnode import __version__

IMPLEMENTATION_CLASS_UID = "2.25.266543221878405816488887163786338675912"
# PS3.7 D.3.3.2: 1-16 characters of the default repertoire.
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]
