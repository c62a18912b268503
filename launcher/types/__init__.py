"""What every layer reads, at the bottom of the package (README "Architecture", layer 2): the
plan, the loop's bundles, the backend protocol, the provided objects, the checkpoint state. No
module here imports a launcher module above launcher.errors."""
