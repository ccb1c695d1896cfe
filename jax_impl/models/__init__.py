"""Model families (one file each) on one decoder skeleton (`decoder.py`), and the layers they share (`layers.py`)."""
