import os

ENV_VAR = "STEPFUSION_DATA"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def data_root():
    """$STEPFUSION_DATA if set, else ../shared/data beside the checkout (or beside the working directory)."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    for base in (_REPO_ROOT, os.getcwd()):
        candidate = os.path.normpath(os.path.join(base, "..", "shared", "data"))
        if os.path.isdir(candidate):
            return candidate
    return os.path.normpath(os.path.join(_REPO_ROOT, "..", "shared", "data"))


def resolve_data_path(path, default_relative):
    """`path` if given, else `default_relative` under data_root(); a missing path is a clear error."""
    resolved = path if path is not None else os.path.join(data_root(), default_relative)
    if not os.path.exists(resolved):
        raise FileNotFoundError(
            f"data not found at {resolved}; pass a path or set {ENV_VAR} to the directory holding it"
        )
    return resolved
