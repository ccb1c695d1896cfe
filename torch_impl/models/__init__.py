"""Model families (one file each) and the layers they share."""
