"""dicomnode: a DICOM network node (storage, query/retrieve, worklist) and its SCU tools.

Importing the package has no side effects; the node starts only through ``dicomnode.ae.serve``
(the ``dicomnode serve`` command).
"""

__version__ = "0.1.0"
