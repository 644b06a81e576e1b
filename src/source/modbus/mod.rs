//! Modbus TCP polling.
