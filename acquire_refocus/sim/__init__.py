"""The simulated microscope: PSF, specimen, camera, drift, and Micro-Manager devices around them."""
