//! download
