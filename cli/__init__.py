"""The ``regionclip`` command line: parses arguments, calls the library, prints."""
