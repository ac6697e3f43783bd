"""A TRIDENT or CLAM job folder → a PathChat features folder (see README.md)."""

from data_recipes.from_trident.convert import (
    DiscoveredJob,
    FeatureSource,
    FromTridentConfig,
    FromTridentResult,
    JobFolderError,
    discover_feature_files,
    import_job,
    main,
    read_mpp_table,
)

__all__ = [
    "DiscoveredJob",
    "FeatureSource",
    "FromTridentConfig",
    "FromTridentResult",
    "JobFolderError",
    "discover_feature_files",
    "import_job",
    "main",
    "read_mpp_table",
]
