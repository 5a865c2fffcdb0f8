"""DIMSE handlers: thin adapters from a pynetdicom event to a named status.

Each takes the event and the running :class:`dicomnode.ae.Node`; the work is done by the archive.
"""
