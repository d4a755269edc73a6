"""Fake `modules.patches`: patch raises on a double patch, as the host does."""

originals: dict = {}


def patch(key, obj, field, replacement):
    patch_key = (obj, field)
    if patch_key in originals.setdefault(key, {}):
        raise RuntimeError(f"patch for {field} is already applied")
    original = getattr(obj, field)
    originals[key][patch_key] = original
    setattr(obj, field, replacement)
    return original


def undo(key, obj, field):
    patch_key = (obj, field)
    if patch_key not in originals.get(key, {}):
        return None
    original = originals[key].pop(patch_key)
    setattr(obj, field, original)


def original(key, obj, field):
    return originals.get(key, {}).get((obj, field))
