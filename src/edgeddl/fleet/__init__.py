"""The fleet: device and link profiles, membership schedules, the virtual clock,
misbehaving devices."""
