"""The protection methods and what wraps every one of them: the face pipeline (crop, protect, paste) and its receipt."""
