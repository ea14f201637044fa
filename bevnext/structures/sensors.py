"""Sensor channel names, defined once."""

CAMERAS: tuple[str, ...] = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_FRONT_LEFT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_BACK_RIGHT",
)
"""The six camera channels in the reference's (and nuScenes') order; camera index n follows it."""

LIDAR = "LIDAR_TOP"
"""The LiDAR channel whose key sample_data defines a sample's timestamp."""

KEY_CAMERA = "CAM_FRONT"
"""The camera whose ego pose at its timestamp defines the key frame."""
