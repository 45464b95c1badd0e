"""Split learning: the fronts on the devices, the rear on the coordinator, the cut's wire."""
