__version__ = "0.1.0"
# Bumped whenever report.json changes shape; readers refuse a major version they do not know.
SCHEMA_VERSION = "1.0"
