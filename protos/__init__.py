"""specray's wire contract. `specray.proto` is the only schema; `specray_pb2*.py` are generated from it by
`python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/specray.proto`
(run from the repository root) and committed; tests/unit/test_protos.py fails when they drift apart."""
