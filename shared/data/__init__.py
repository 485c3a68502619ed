"""Images in, arrays out: decode, dataset scan/check/split, archives, download, cache, transforms."""
