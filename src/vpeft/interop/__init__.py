"""Interoperability with other PEFT libraries' file formats."""

from .peft import export_peft, import_peft

__all__ = ["export_peft", "import_peft"]
