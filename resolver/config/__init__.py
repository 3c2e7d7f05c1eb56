"""The blueprint (contract §9): one TOML file, validated once at start-up into a frozen Settings object.

schema.py: its shape (JSON Schema); tables.py: one frozen dataclass per table, the defaults; settings.py: the
Settings object, its overrides and the rules across fields; load.py: reading and validating it; describe.py:
`resolver blueprint check`'s summary.
"""

from resolver.config.describe import describe
from resolver.config.load import load_settings, settings_from_document
from resolver.config.schema import ATTRIBUTE_TYPES, BLUEPRINT_SCHEMA, DEFAULT_VIEW, PRECEDENCE
from resolver.config.settings import Settings
from resolver.config.tables import (
    ActivitySettings,
    AttributeSpec,
    AuthSettings,
    EncryptionKey,
    EncryptionSettings,
    EventSettings,
    IndexSettings,
    InteractionSettings,
    LimitSettings,
    LoggingSettings,
    MatchingSettings,
    MetricsSettings,
    OutboundSpec,
    ReliabilitySettings,
    ServerSettings,
    SourceSpec,
    StorageSettings,
    TlsSettings,
)

__all__ = [
    "ATTRIBUTE_TYPES", "BLUEPRINT_SCHEMA", "DEFAULT_VIEW", "PRECEDENCE",
    "ActivitySettings", "AttributeSpec", "AuthSettings", "EncryptionKey", "EncryptionSettings",
    "EventSettings", "IndexSettings", "InteractionSettings", "LimitSettings",
    "LoggingSettings", "MatchingSettings", "MetricsSettings",
    "OutboundSpec", "ReliabilitySettings", "ServerSettings", "Settings", "SourceSpec", "StorageSettings", "TlsSettings",
    "describe", "load_settings", "settings_from_document",
]
