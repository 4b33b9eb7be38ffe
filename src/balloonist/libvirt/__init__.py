"""libvirt domains under balloonist: the connection, the XML, the port, the source."""
