"""Tests that run MLServer runtimes inside the test process.

MLServer and tritonclient.grpc both register the `inference` protobuf package, so
they cannot be imported into one process: these tests run in a pytest session of
their own (see the Makefile's `test` target), the client-side tests in another.
"""
