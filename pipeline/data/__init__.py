"""The data layer: data sets and their formats, split files, checks, conversions, class maps and prompts."""
