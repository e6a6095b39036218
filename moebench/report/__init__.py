"""Result files and what is rendered from them: the files and tables (``results``), the report page
(``page``), its plots (``plots``) and the fault table (``fault_table``). Rendering never imports torch."""
