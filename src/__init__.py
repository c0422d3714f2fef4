"""image2biomass: CSIRO Image2Biomass solution package (imported by the top-level scripts)."""
