"""DKMS sources as kvc instances: ``kvc dkms import`` turns a ``dkms.conf`` source (a directory, a
tarball, DKMS's ``mktarball`` layout or a Debian ``*-dkms`` package) into an instance bundle whose
generated Containerfile builds it with kvc's dkms.conf driver; ``kvc dkms status`` shows the
instances DKMS-style. A dkms.conf is a bash script: it is only ever evaluated inside a container."""
