"""The run store (folders on disk) and its Redis mirror."""
