"""Demo rows, one module per topic; each exports ``cases() -> list[DemoCase]``."""
