"""Development support shared by the tests, the benchmarks and `make demo`, kept out of the library: tiny model
families and calibration rows, throwaway project repositories, a local S3 server, the demo, the import-graph and
artifact-digest checks."""
