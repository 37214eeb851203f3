"""Ground-floor helpers shared by every layer: process groups, ports, atomic files, fingerprints,
fault-injection points (chaos tests).

Modules here import only the standard library, third-party packages and ``spec_core.errors`` /
``spec_core.config``, so any floor of spec_core may use them without an import circle.
"""
