"""One module per ``synthtune`` command. Jobs sit on top: they import the library, never each other's
internals, and nothing in the library imports them."""
