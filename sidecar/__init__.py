"""PrestaShop Billing entitlement sidecar."""

__version__ = "0.1.0"
