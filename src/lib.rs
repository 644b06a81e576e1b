//! citygate: an edge gateway for city-brain meter data.
pub mod reading;
pub mod seal;
