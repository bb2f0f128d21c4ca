"""The base layer, imported by every room and importing none of them (standard library only, torch inside functions):
typed errors (``errors``), atomic files, JSON and digests (``io``), the artifact protocol (``artifact``), torchrun
processes (``distributed``), devices and threads (``devices``), the one ``Placement`` a command makes (``placement``),
the option machinery (``options``, ``values``, ``flags``), the flat UNet inputs (``unet_inputs``), tensor
fingerprints (``fingerprint``) and lazily resolved public surfaces (``lazy``)."""
