"""One module per tab of the page; each has `build(lab)` (layout) and `wire(lab, ui, ...)` (events)."""
