"""The command-line front door of splitmoe (`python -m splitmoe` / `splitmoe`). The library lives in shared_math,
torch_impl and jax_impl; this package only parses arguments and calls them."""
