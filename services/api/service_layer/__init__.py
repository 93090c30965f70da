"""Use cases of the API that are more than one query: the FHIR bulk export jobs."""
